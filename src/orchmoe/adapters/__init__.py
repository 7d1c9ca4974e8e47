"""Adapter persistence, in one place: the adapter folder (write, read, validate), its metadata (base-model
provenance and fingerprint), the Hugging Face Hub, PEFT LoRA interop and exports."""
