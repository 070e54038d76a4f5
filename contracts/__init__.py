"""What the jobs share: the contracts between them and the helpers every job uses.

  manifest         the data contract preprocess writes and every job reads
  sequences, histories, vocab   reading that data: CSR sequences, evaluation
                   queries, vocabularies with their raw id types
  export_manifest  the trainer's export contract (export/export_manifest.json)
  model_layout     what a trainer model_dir holds
  candidates       the retrieval job's output layout
  metrics          leave-one-out and reranking metrics: one rank convention
  errors, cli, fileio, locks   one-line errors, flag helpers, atomic writes, locks
  tf_runtime       process settings before TensorFlow loads

No module here imports TensorFlow or FAISS, and no module imports a job's
package (tests/test_import_rules.py).
"""
