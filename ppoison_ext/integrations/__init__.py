"""Bridges to other toolkits: :mod:`.art` (the Adversarial Robustness Toolbox; ``pip install
'ppoison_ext[art]'``). Nothing here is imported by the rest of the package."""

__all__ = ["art"]
