"""Tandem serving engine: proxy/front, accelerator workers, supervisor."""
