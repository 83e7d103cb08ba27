"""The proxy benchmark: the paper's setting rebuilt from the public datasets in shared/data.

`python -m experiments.proxy.data` builds the dataset, `python -m experiments.proxy.benchmark`
runs every row of docs/results.md (README, "Proxy benchmark on public data").
"""
