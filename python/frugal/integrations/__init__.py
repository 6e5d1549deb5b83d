"""Adapters that put frugal under other libraries' models.

Each submodule imports the library it adapts; ``import frugal`` imports none of them, so those
libraries stay optional dependencies (``pip install "frugal[transformers]"``).

- :mod:`frugal.integrations.transformers`: Hugging Face transformers decoder models on
  frugal's block-sparse attention, paged KV-cache and int8 linears.
"""
