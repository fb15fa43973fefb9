"""The embedded default: real handwritten digit scans (scikit-learn) in the MMEB / LLaVA forms, and the main job
that trains and evaluates a tiny CREM on them, offline, on a CPU."""
