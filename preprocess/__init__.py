"""The `preprocess` job: raw click logs -> vocabularies + sharded TFRecords.

`preprocess.manifest` defines the data contract that `trainer` and `retrieval`
read; the other modules build it.
"""
