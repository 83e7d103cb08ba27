"""Training: data loading, the RADAR losses, the trainer, experts and teacher scoring."""
