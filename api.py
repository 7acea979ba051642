"""``genius.api``: search a finished run from Python (notebooks, services). See README "Python API".

The implementation lives with the other stage-3 code, in ``models/generative_retriever/api.py``.
"""
from genius.models.generative_retriever.api import Hit, Query, Retriever

__all__ = ["Hit", "Query", "Retriever"]
