"""The folder a local run's Ray keeps its sockets and logs in: only this user can enter it."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from launch import private_ray_temp_dir


@pytest.fixture
def short_tmp():
    """A system temp folder as short as /tmp (pytest's own is too long for Ray's sockets)."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


def refusal(capsys, system_temp) -> str:
    with pytest.raises(SystemExit) as exit_info:
        private_ray_temp_dir(system_temp)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_the_folder_is_created_closed_to_others_and_reused(short_tmp):
    temp_dir = private_ray_temp_dir(short_tmp)
    private = short_tmp / f"ray-{os.getuid()}"
    assert temp_dir == private / "ray"
    assert private.stat().st_mode & 0o777 == 0o700 and private.stat().st_uid == os.getuid()
    assert private_ray_temp_dir(short_tmp) == temp_dir  # the next run's


def test_a_folder_open_to_others_is_refused_and_left_as_it_is(short_tmp, capsys):
    private = short_tmp / f"ray-{os.getuid()}"
    private.mkdir()
    private.chmod(0o757)
    assert refusal(capsys, short_tmp) == (
        f"launch.py: error: {private} (the folder of your local runs' Ray) is open to other "
        f"users (mode 757; anything could have been planted in it): remove it\n")
    assert private.stat().st_mode & 0o777 == 0o757 and not any(private.iterdir())


def test_another_users_folder_is_refused(short_tmp, capsys):
    if os.getuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    private = short_tmp / f"ray-{os.getuid()}"
    private.mkdir(mode=0o700)
    os.chown(private, 65534, 65534)
    assert refusal(capsys, short_tmp) == (
        f"launch.py: error: {private} (the folder of your local runs' Ray) belongs to uid "
        f"65534, not to you (uid {os.getuid()}): remove it\n")


def test_a_planted_symlink_is_refused_not_followed(short_tmp, capsys):
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir(mode=0o700)  # the user's own and closed: only the link is wrong
    (short_tmp / f"ray-{os.getuid()}").symlink_to(elsewhere)
    assert refusal(capsys, short_tmp) == (
        f"launch.py: error: {short_tmp / f'ray-{os.getuid()}'} (the folder of your local runs' "
        f"Ray) is a symlink: remove it\n")
    assert not any(elsewhere.iterdir())


def test_a_temp_folder_too_long_for_rays_sockets_is_refused_before_anything_is_made(
        short_tmp, capsys):
    deep = short_tmp / ("x" * 30)
    deep.mkdir()
    assert "too long a path for Ray's sockets" in refusal(capsys, deep)
    assert not any(deep.iterdir())
