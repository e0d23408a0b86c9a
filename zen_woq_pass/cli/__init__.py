"""``zen-woq`` (``main``): ``run`` (the main job), ``doctor`` (what this machine can run),
``measure`` (the timings behind the package's rules: ``evidence``)."""
