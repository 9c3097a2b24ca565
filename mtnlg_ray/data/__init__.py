"""Data stages: read raw text, clean, dedup, pseudo-label, filter, tokenize and pack."""
