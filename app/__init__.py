"""RADAR: a risk-aware router in front of content-moderation verticals."""
