import sys
from pathlib import Path

# The project keeps its code under src/ without packaging it; make it importable for pytest.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
