"""One decision per quantized layer, made once: may a 4-bit kernel take it (``eligibility``, the
``platform`` gate), does the kernel compute it right here (``selfcheck`` within ``numerics``'
bound), and the result with its packed constants (``plan``), shown to the user (``report``)."""
