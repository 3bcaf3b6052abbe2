import math, pytest, torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset
from lightning_ext.distillation.module import DistillationModule

def _data(nan):
    x = torch.randn(32, 6); y = torch.randint(0, 3, (32,))
    if nan: x[3, 2] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8)

def test_distillation_module_refuses_a_nan_loss_with_one_line(tmp_path):
    teacher = torch.nn.Linear(6, 3); student = torch.nn.Linear(6, 3)
    m = DistillationModule(student, teacher, num_classes=3)
    t = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="NaN|non-finite"):
        t.fit(m, _data(True))
    assert all(torch.isfinite(p).all() for p in m.parameters())
