"""The data layer: the JSONL record format, its loading and validation, batch scoring.

Shared by training, teacher scoring, evaluation and calibration, so that none of them imports
another for its data. Imports only `app.model` (the post and the input builder).
"""
