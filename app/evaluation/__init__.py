"""Evaluation: per-category detection and traffic-reduction metrics, threshold calibration."""
