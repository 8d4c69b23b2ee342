"""Measures of what the experts learned, shared by the studies and the reports."""
