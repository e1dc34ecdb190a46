"""Results -> what people and programs read: records (JSON-ready dicts), documents, tables, schemas, plots.

Nothing here computes an estimate. ``records`` lays out each result as one
dict shape (and reads it back), ``documents`` assembles the ``--json`` outputs
from records, ``schemas`` states their contract, ``tables`` renders them with
rich, and ``plot`` draws them.
"""
