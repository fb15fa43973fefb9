"""Integrations of CREM with other libraries' evaluation and serving stacks.

Each integration is its own module and imports its library only when it is imported itself (the libraries are
optional extras):

- `crem_hf.integrations.mteb`: CREM as an `mteb` 2.x model (MTEB / MIEB), a local caption-retrieval task, and
  model-card entries from mteb result files (`pip install crem-hf[mteb]`).
"""
