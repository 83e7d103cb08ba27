"""Tests of app.training."""
