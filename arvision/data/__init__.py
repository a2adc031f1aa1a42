"""The data layer: image sources, the ``prepare`` step and Parquet I/O.

- :mod:`arvision.data.sources`: ``SOURCES`` (emoji, folder, mnist, parquet, webdataset) → records
  ``(origin, data, label)`` and class names.
- :mod:`arvision.data.prepare`: ``prepare_dataset(cfg, seed, out_dir)`` → shards + manifest.
- :mod:`arvision.data.parquet_io`: ``PREPARED_SCHEMA``, ``write_shards``, ``read_split``,
  ``load_images``; the one set of Parquet writer options.
- ``emoji/``: the embedded default data set (Noto Color Emoji, Apache-2.0).

Nothing is imported here, so that ``import arvision.data.parquet_io`` stays light.
"""
