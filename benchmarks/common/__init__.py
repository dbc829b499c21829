"""What every benchmark shares: the load generator, server processes, the photo corpus, statistics,
metrics scraping, the machine description, results files and generated docs blocks."""
