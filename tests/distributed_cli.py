"""`longcat train` several times in one `torchrun` launch: process start-up and imports cost most of
a launch on a small CPU. argv[1] is a JSON list of argument lists; after each run a line
`[run N exit CODE]` goes to stdout."""

import json
import sys

from longcat_train.cli import app

if __name__ == "__main__":
    for number, args in enumerate(json.loads(sys.argv[1])):
        code = app(args, standalone_mode=False)
        print(f"[run {number} exit {code or 0}]", flush=True)
