"""Results -> what people and programs read: ``--json`` documents, rich tables, plots.

Nothing here computes an estimate. ``documents`` assembles the ``--json`` outputs from
the records of ``results.records`` (their contract: ``results.schemas``), ``tables``
and ``annealing_tables`` render them with rich, and ``plot`` draws them. A registered
estimator without a document or table of its own gets both from its declared columns
(``documents.run_document``, ``tables.render_run``).
"""
