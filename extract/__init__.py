"""Feature extractors: read media paths from the store's utterances, write feature tables."""
