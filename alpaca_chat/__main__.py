from alpaca_chat.cli import main

raise SystemExit(main())
