"""``python -m zen_woq_pass`` is ``zen-woq``."""

from zen_woq_pass.cli.main import main

raise SystemExit(main())
