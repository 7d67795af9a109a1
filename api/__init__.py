"""The API's project-wide pieces: who may call it (tokens, ``auth``), signed pushes
(``push_sign``, ``push_replay``) and the request-body limit (``body_limit``)."""
