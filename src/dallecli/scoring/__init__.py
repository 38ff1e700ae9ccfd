"""Image–text scoring with CLIP models (``dalle score``) and best-of-K reranking (``--rerank``)."""
