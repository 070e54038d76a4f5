"""The `preprocess` job: raw click logs -> vocabularies + sharded TFRecords.

`contracts.manifest` defines the data contract that it writes and `trainer`
and `retrieval` read.
"""
