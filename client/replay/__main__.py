"""`python -m client.replay ARGS`: the same as `kunserve replay ARGS`."""

import sys

from client.replay.cli import replay_main

sys.exit(replay_main())
