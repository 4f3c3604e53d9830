"""The trusted side's entry point inside the enclave (see legrace-trusted.manifest.template).

The worker's shared secret comes from the encrypted /data mount, whose key only an attested
enclave receives; the host never sees it. A run continues from its checkpoint when one exists,
so restarting the enclave after a crash (the worker died, the host rebooted) resumes it without
spending privacy twice (the privacy ledger lives in the sealed /out mount).
"""

import os
import sys
from pathlib import Path

from legrace.cli import main

SECRET_FILE = Path("/data/worker.secret")


def arguments(argv: list[str]) -> list[str]:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path("runs/legrace")
    return argv + ["--resume"] if (out / "checkpoint.pt").exists() and "--resume" not in argv else argv


if __name__ == "__main__":
    os.environ["LEGRACE_SECRET"] = SECRET_FILE.read_text().strip()
    sys.exit(main(arguments(sys.argv[1:])))
