"""The decision log, verdict feedback and the online quality estimates built on them."""
