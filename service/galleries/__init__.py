"""Galleries: labelled example images per model, kept on disk, answered by nearest-neighbour search.

`store.py` keeps a gallery durable and bounded (images, entries, embeddings per model version);
`search.py` finds the nearest examples of a query embedding and turns them into a kNN vote;
`manager.py` holds every model's gallery in a process: which version answers, adds embedded before
they are written, and the background re-embedding for newly served versions.
"""
