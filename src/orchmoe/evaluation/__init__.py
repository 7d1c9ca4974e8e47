"""Scoring: the official SuperNI metrics (ROUGE-L with stemming, exact match, ROUGE-Lsum)."""
