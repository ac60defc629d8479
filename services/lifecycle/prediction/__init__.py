"""Predictive repurchase: BG/NBD and Gamma-Gamma models fitted on customers' purchase summaries."""
