"""BIDS side of neuroflow: the dataset writer (dataset) and the real validator (validator)."""
