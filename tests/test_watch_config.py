"""codecsight-client watch's config: TOML or YAML, one schema, errors that name the file,
the camera and the key."""
import subprocess
import sys
import textwrap

import pytest

from codecsight_client.watch_config import ConfigError, load

TOML = """
server = "10.0.0.2:8001"
queue_depth = 3
[defaults]
policy = "dense"
fps = 1
[[cameras]]
stream_id = "dock-1"
url = "rtsp://10.0.0.5/stream1"
question = "is a truck at the dock?"
stride_seconds = 1
[[cameras]]
stream_id = "lobby"
url = "recordings/lobby.mp4"
replay_realtime = true
policy = "codec"
max_attempts = 5
"""

YAML = """
server: 10.0.0.2:8001
queue_depth: 3
defaults: {policy: dense, fps: 1}
cameras:
  - {stream_id: dock-1, url: "rtsp://10.0.0.5/stream1", question: "is a truck at the dock?",
     stride_seconds: 1}
  - {stream_id: lobby, url: recordings/lobby.mp4, replay_realtime: true, policy: codec,
     max_attempts: 5}
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name,text", [("cams.toml", TOML), ("cams.yaml", YAML)])
def test_toml_and_yaml_give_the_same_cameras(tmp_path, name, text):
    (tmp_path / "recordings").mkdir()
    (tmp_path / "recordings" / "lobby.mp4").write_bytes(b"")   # a file camera must exist
    config, cameras = load(write(tmp_path, name, text))
    assert (config.server, config.queue_depth) == ("10.0.0.2:8001", 3)
    dock, lobby = cameras
    assert (dock.stream_id, dock.source, dock.question) == (
        "dock-1", "rtsp://10.0.0.5/stream1", "is a truck at the dock?")
    assert (dock.policy, dock.analysis_fps, dock.stride, dock.max_attempts) == ("dense", 1, 1, None)
    # defaults apply unless the camera says otherwise; files are found next to the config
    assert (lobby.policy, lobby.analysis_fps, lobby.replay_realtime) == ("codec", 1, True)
    assert lobby.source == str(tmp_path / "recordings" / "lobby.mp4")
    assert lobby.stride == lobby.window_seconds / 4 and lobby.max_attempts == 5


@pytest.mark.parametrize("text,message", [
    ('[[cameras]]\nstream_id = "a"\nurl = "rtsp://h/a"\nfps = 0\n',
     r"camera 1 \(a\), key 'fps': Input should be greater than 0"),
    ('[[cameras]]\nstream_id = "a"\nurl = "rtsp://h/a"\npolcy = "dense"\n',
     r"camera 1 \(a\), key 'polcy': unknown key \(a typo\?\)"),
    ('[[cameras]]\nstream_id = "a"\nurl = "rtsp://h/a"\npolicy = "fast"\n',
     r"camera 1 \(a\), key 'policy': Input should be 'dense', 'evs', 'codec' or 'vllm_evs'"),
    ('[[cameras]]\nurl = "rtsp://h/a"\n', r"camera 1, key 'stream_id': missing"),
    ('[[cameras]]\nstream_id = "a b"\nurl = "rtsp://h/a"\n',
     r"camera 1 \(a b\), key 'stream_id': String should match pattern"),
    ('[[cameras]]\nstream_id = "a"\nurl = "x"\n[[cameras]]\nstream_id = "a"\nurl = "y"\n',
     r"stream_id 'a' is given to more than one camera"),
    ('[defaults]\nfsp = 2\n[[cameras]]\nstream_id = "a"\nurl = "x"\n', r"'fsp'.*unknown key"),
    ('cameras = []\n', r"key 'cameras': List should have at least 1 item"),
    ('[[cameras]\n', r"not valid TOML"),
])
def test_a_bad_config_names_the_file_the_camera_and_the_key(tmp_path, text, message):
    path = write(tmp_path, "cams.toml", text)
    with pytest.raises(ConfigError, match=message) as error:
        load(path)
    assert str(error.value).startswith(str(path))


def test_a_config_of_another_format_or_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"cams.json: unknown config format '.json'"):
        load(write(tmp_path, "cams.json", "{}"))
    with pytest.raises(ConfigError, match=r"absent.toml: cannot read the config"):
        load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load(write(tmp_path, "cams.yaml", "cameras: [a, {b: }"))


def test_a_yaml_mistake_is_one_line_with_its_line_and_column(tmp_path):
    path = write(tmp_path, "cams.yml", "cameras:\n  - stream_id: a: b\n")
    with pytest.raises(ConfigError) as error:
        load(path)
    # PyYAML's marks count from 0; editors (and this message) from 1
    assert str(error.value) == (f"{path}: not valid YAML: line 2 column 17: mapping values are "
                                "not allowed here")


def test_a_validator_message_reads_without_pydantics_prefix(tmp_path):
    path = write(tmp_path, "cams.toml", '[[cameras]]\nstream_id = "a"\nurl = "rtsp://h/x"\n'
                 '[[cameras]]\nstream_id = "a"\nurl = "rtsp://h/y"\n')
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value) == (f"{path}: the file: stream_id 'a' is given to more than one "
                                "camera; each camera needs its own")


def test_defaults_take_every_camera_key_but_stream_id_and_url(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    every = ('question = "q?"\npolicy = "dense"\nrefresh = "full"\nfps = 1\n'
             'window_seconds = 4\nstride_seconds = 2\nreplay_realtime = true\n'
             'max_attempts = 2\nvideo_track = 0\n')
    _, (camera,) = load(write(tmp_path, "cams.toml", f'[defaults]\n{every}[[cameras]]\n'
                              'stream_id = "a"\nurl = "a.mp4"\n'))
    assert (camera.question, camera.policy, camera.refresh, camera.analysis_fps,
            camera.window_seconds, camera.stride, camera.replay_realtime, camera.max_attempts,
            camera.video_track) == ("q?", "dense", "full", 1, 4, 2, True, 2, 0)
    with pytest.raises(ConfigError, match=r"key 'defaults.url': not allowed in defaults"):
        load(write(tmp_path, "cams.toml", '[defaults]\nurl = "a.mp4"\n[[cameras]]\n'
                   'stream_id = "a"\n'))


def test_a_missing_file_camera_is_refused_naming_the_camera_and_the_resolved_path(tmp_path):
    path = write(tmp_path, "cams.toml", '[[cameras]]\nstream_id = "cam"\nurl = "rtsp://h/x"\n'
                 '[[cameras]]\nstream_id = "lobby"\nurl = "recordngs/lobby.mp4"\n')
    with pytest.raises(ConfigError) as error:
        load(path)
    assert str(error.value) == (f"{path}: camera 2 (lobby), key 'url': no such file "
                                f"{(tmp_path / 'recordngs' / 'lobby.mp4').resolve()}")


def test_watch_with_an_invalid_config_exits_2_naming_the_problem(tmp_path):
    path = write(tmp_path, "cams.yaml", "cameras:\n  - {stream_id: a, url: x, fps: -1}\n")
    run = subprocess.run([sys.executable, "-m", "codecsight_client.cli", "watch", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert "invalid config" in run.stderr and "camera 1 (a), key 'fps'" in run.stderr


def test_a_file_under_the_home_directory_is_opened_expanded(tmp_path, monkeypatch):
    """`~/clip.mp4` must reach the camera as the real path: PyAV does not expand ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clip.mp4").write_bytes(b"not checked here")
    config = tmp_path / "cams.toml"
    config.write_text('[[cameras]]\nstream_id = "a"\nurl = "~/clip.mp4"\n')
    _, cameras = load(config)
    assert cameras[0].source == str(tmp_path / "clip.mp4")
