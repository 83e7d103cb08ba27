"""The router model: backbones, pooling, MLP and heads, the shared input builder, the store.

Never imports FastAPI, the service, training or evaluation (DESIGN.md, directions).
"""
