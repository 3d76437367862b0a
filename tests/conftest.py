import os
import sys
from pathlib import Path

# grpc's C core logs connection chatter at INFO; keep test output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
