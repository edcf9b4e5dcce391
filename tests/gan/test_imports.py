import subprocess
import sys


def test_importing_gan_loads_no_ray_mlflow_or_pipeline():
    code = (
        "import sys, gan, gan.models, gan.step, gan.toy, gan.augment, gan.ema, gan.sampling,"
        " gan.export;"
        "top = {m.split('.')[0] for m in sys.modules};"
        "print(sorted(top & {'ray', 'mlflow', 'pipeline', 'dvc'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
