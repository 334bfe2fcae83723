"""Loading: base files, weights formats, model surgery and the text encoder (one home for all loading)."""
