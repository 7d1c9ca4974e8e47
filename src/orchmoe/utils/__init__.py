"""Infrastructure shared by every layer of the package: the one atomic file writer, the one Markdown table writer."""
