"""Tests for guard.preprocess: decoding untrusted images and matching the HF image processors."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file

from guard.errors import InvalidImageError, ModelLoadError
from guard.preprocess import MEDIA_TYPES, ImageLimits, PreprocessConfig, lesion_channels, load_image, preprocess, to_pixels

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CFG = PreprocessConfig(image_size=32, image_mean=CLIP_MEAN, image_std=CLIP_STD)


# ---- helpers ---------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a valid CRC) claims width x height 8-bit RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # a few scanline bytes: nowhere near enough, never decoded
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)  # bundled with pydicom; never hit the network
    if path is None:
        pytest.skip(f"pydicom does not bundle {name}")
    return path


def _dicom(name: str, **changes) -> bytes:
    """A bundled pydicom test file, optionally with some attributes changed in memory."""
    ds = pydicom.dcmread(_testfile(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _gray(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    assert image.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    return arr[..., 0]


# ---- round trips and parity with transformers ------------------------------------------------


@pytest.mark.parametrize("fmt, media_type, atol_levels", [("PNG", "image/png", 0), ("JPEG", "image/jpeg", 1)])
def test_constant_gray_image_maps_to_rescaled_and_normalized_value(fmt, media_type, atol_levels):
    v = 100
    data = _encode(Image.new("RGB", (40, 30), (v, v, v)), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    x = preprocess(data, media_type, CFG)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    expected = (v / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    # JPEG may move a flat gray by one level; PNG is lossless.
    atol = (atol_levels + 1e-3) / 255 / min(CLIP_STD)
    np.testing.assert_allclose(x, np.broadcast_to(expected[:, None, None], x.shape), atol=atol)


def test_to_pixels_matches_idefics3_processor_for_square_image():
    from transformers import Idefics3ImageProcessorPil  # the PIL backend; torchvision is not installed

    proc = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64},
                                     max_image_size={"longest_edge": 64}, resample=Image.Resampling.LANCZOS)
    cfg = PreprocessConfig.from_hf(proc.to_dict())
    image = _noise(300, 300)
    ours = to_pixels(image, cfg)
    theirs = proc(image, return_tensors="np")["pixel_values"][0, 0]  # [batch, images, 3, S, S]
    assert ours.shape == theirs.shape == (3, 64, 64)
    # Same PIL resize call and same float arithmetic, so only float32 rounding can differ.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("width, height", [(97, 61), (45, 130)])
def test_to_pixels_matches_clip_processor_for_non_square_image(width, height):
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = PreprocessConfig.from_hf(proc.to_dict())
    image = _noise(width, height, seed=1)
    ours = to_pixels(image, cfg)
    theirs = proc(image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


# ---- reading Hugging Face configs ------------------------------------------------------------


def test_from_hf_reads_smolvlm_config_as_unsplit_max_image_size_square():
    smolvlm = {  # as in HuggingFaceTB/SmolVLM-256M-Instruct
        "image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True, "resample": 1,
        "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
    }
    cfg = PreprocessConfig.from_hf(smolvlm)
    assert cfg == PreprocessConfig(image_size=512, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
                                   rescale_factor=1 / 255, resample=1, crop="none")


def test_from_hf_reads_llava_clip_config_as_center_crop():
    from transformers import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).to_dict()
    cfg = PreprocessConfig.from_hf(hf)
    assert (cfg.image_size, cfg.crop, cfg.resample) == (336, "center", 3)
    assert cfg.image_mean == pytest.approx(CLIP_MEAN) and cfg.image_std == pytest.approx(CLIP_STD)


def test_from_hf_missing_image_mean_raises_model_load_error_naming_key_and_file():
    from transformers import Idefics3ImageProcessorPil

    hf = Idefics3ImageProcessorPil().to_dict()
    del hf["image_mean"]
    with pytest.raises(ModelLoadError, match=r"preprocessor_config\.json.*image_mean"):
        PreprocessConfig.from_hf(hf)


@pytest.mark.parametrize("change, key", [
    ({"image_processor_type": "SiglipImageProcessor"}, "image_processor_type"),
    ({"max_image_size": None}, "max_image_size"),
    ({"image_std": [0.5, 0.5]}, "image_std"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"resample": 9}, "resample"),
])
def test_from_hf_invalid_key_raises_model_load_error_naming_it(change, key):
    from transformers import Idefics3ImageProcessorPil

    with pytest.raises(ModelLoadError, match=key):
        PreprocessConfig.from_hf({**Idefics3ImageProcessorPil().to_dict(), **change})


def test_config_round_trips_through_json():
    cfg = PreprocessConfig(image_size=336, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=1, crop="center")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_without_channels_reads_as_rgb_so_older_bundles_still_load():
    cfg = PreprocessConfig(image_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD, channels="lesion-enhance")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).channels == "lesion-enhance"
    old = {k: v for k, v in cfg.to_dict().items() if k != "channels"}
    assert PreprocessConfig.from_dict(old).channels == "rgb"


def test_lesion_channels_light_a_small_bright_dot_alone_against_a_flat_background():
    grey = np.full((32, 32), 0.3)
    grey[10:12, 20:22] = 0.8  # a 2 x 2 px dot
    grey[:, 2:8] = 0.7  # and a band too wide for the 3 x 3 top-hat
    luma, tophat, dog = np.moveaxis(lesion_channels(grey), -1, 0)
    assert np.array_equal(luma, grey)
    assert tophat[10:12, 20:22].min() == pytest.approx(1.0)  # (0.8 - 0.3) * 2
    outside = np.ones_like(grey, bool)
    outside[10:12, 20:22] = False
    assert tophat[outside].max() == pytest.approx(0.0)  # the band and the flat ground are opened away
    assert np.unravel_index(dog.argmax(), dog.shape) in {(10, 20), (10, 21), (11, 20), (11, 21)}
    assert dog[25:, 15:19] == pytest.approx(0.5)  # flat ground, 6 px (3 sigma) from both: no blob response


def test_lesion_enhance_pixels_are_the_lesion_channels_of_the_luma_normalized():
    rgb = _noise(16, 16, seed=3)
    cfg = PreprocessConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.25,) * 3, channels="lesion-enhance")
    expected = (lesion_channels(np.asarray(rgb.convert("L"), np.float64) / 255) - 0.5) / 0.25
    np.testing.assert_allclose(to_pixels(rgb, cfg), expected.transpose(2, 0, 1), atol=1e-6)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        PreprocessConfig(image_size=0, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with pytest.raises(ValueError, match="crop"):
        PreprocessConfig(image_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD, crop="random")
    with pytest.raises(ValueError, match="channels.*lesion-enhance"):
        PreprocessConfig(image_size=8, image_mean=CLIP_MEAN, image_std=CLIP_STD, channels="hsv")
    with pytest.raises(ValueError, match="max_pixels"):
        ImageLimits(max_pixels=0)


# ---- rejecting bad payloads ------------------------------------------------------------------


@pytest.mark.parametrize("media_type", MEDIA_TYPES)
def test_random_bytes_are_rejected(media_type):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError):
        load_image(data, media_type)


@pytest.mark.parametrize("load_truncated_images", [False, True])
def test_truncated_png_is_rejected_even_if_pillow_is_told_to_load_truncated_images(monkeypatch,
                                                                                  load_truncated_images):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated_images)
    data = _encode(_noise(64, 64), "PNG")
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(data[: len(data) // 2], "image/png")


def test_truncated_jpeg_is_rejected():
    data = _encode(_noise(64, 64), "JPEG")
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(data[: len(data) // 2], "image/jpeg")


@pytest.mark.parametrize("side", [30_000, 8_000])  # over Pillow's own limit, and over only ours
def test_png_header_claiming_huge_size_is_rejected_before_decoding(side):
    t0 = time.perf_counter()
    with pytest.raises(InvalidImageError, match="pixel limit"):
        load_image(_png_claiming(side, side), "image/png")
    assert time.perf_counter() - t0 < 0.5  # decoding, or even allocating, 30000x30000x3 takes far longer


def test_pillow_decompression_bomb_warning_is_an_error_even_when_our_limit_is_higher():
    # 10000 x 10000 is over Pillow's warning threshold (~89M) but under its error threshold.
    with pytest.raises(InvalidImageError, match="pixel limit"):
        load_image(_png_claiming(10_000, 10_000), "image/png", ImageLimits(max_pixels=10**9))


def test_unsupported_media_type_lists_the_supported_ones():
    with pytest.raises(InvalidImageError, match="image/png, image/jpeg, application/dicom"):
        load_image(_encode(_noise(8, 8), "GIF"), "image/gif")


def test_empty_bytes_are_rejected():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"", "image/png")


def test_payload_over_max_bytes_is_rejected():
    data = _encode(_noise(32, 32), "PNG")
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(data, "image/png", ImageLimits(max_bytes=len(data) - 1))


@pytest.mark.parametrize("fmt, declared, actual", [
    ("JPEG", "image/png", "image/jpeg"),
    ("PNG", "image/jpeg", "image/png"),
])
def test_image_declared_as_the_wrong_type_is_rejected_naming_both(fmt, declared, actual):
    with pytest.raises(InvalidImageError, match=f"declared as {declared}.*{actual}"):
        load_image(_encode(_noise(8, 8), fmt), declared)


def test_dicom_declared_as_png_is_rejected_naming_both():
    with pytest.raises(InvalidImageError, match="declared as image/png.*application/dicom"):
        load_image(_dicom("CT_small.dcm"), "image/png")


# ---- PNG modes -------------------------------------------------------------------------------


def test_16bit_grayscale_png_is_min_max_scaled_not_clipped():
    values = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)  # all above 255: clipping would be white
    gray = _gray(load_image(_encode(Image.fromarray(values), "PNG"), "image/png"))
    np.testing.assert_array_equal(gray, [[0, 128], [255, 64]])  # (v - 1000) * 255 / 2000, rounded


def test_rgba_png_is_composited_on_white_like_transformers():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8)
    rgb = np.asarray(load_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png"))
    np.testing.assert_array_equal(rgb, [[[10, 20, 30], [255, 255, 255]]])


def test_palette_png_is_converted_to_rgb():
    image = _noise(16, 16).convert("P")
    loaded = load_image(_encode(image, "PNG"), "image/png")
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))


def test_jpeg_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image = load_image(_encode(_noise(20, 10), "JPEG", exif=exif), "image/jpeg")
    assert image.size == (10, 20)


# ---- DICOM -----------------------------------------------------------------------------------


def test_ct_small_without_window_is_min_max_scaled_in_hounsfield_units():
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    assert "WindowCenter" not in ds
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    gray = _gray(load_image(_dicom("CT_small.dcm"), "application/dicom"))
    assert gray[np.unravel_index(hu.argmin(), hu.shape)] == 0
    assert gray[np.unravel_index(hu.argmax(), hu.shape)] == 255
    assert gray[0, 0] == round((hu[0, 0] - hu.min()) * 255 / (hu.max() - hu.min()))


def test_ct_small_window_is_applied_to_rescaled_values_using_the_first_preset():
    # Slope 2 makes the modality LUT matter; the second preset must be ignored.
    data = _dicom("CT_small.dcm", RescaleSlope=2, RescaleIntercept=-1024,
                  WindowCenter=[40, 300], WindowWidth=[400, 1500])
    gray = _gray(load_image(data, "application/dicom"))
    stored = pydicom.dcmread(_testfile("CT_small.dcm")).pixel_array.astype(np.float64)
    hu = stored * 2 - 1024
    for r, c in [tuple(np.argwhere(hu < -160)[0]), tuple(np.argwhere(hu > 240)[0])]:
        assert gray[r, c] == (0 if hu[r, c] < -160 else 255)  # outside the soft-tissue window
    for r, c in np.argwhere((hu > -150) & (hu < 230))[:5]:
        # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * (ymax - ymin) + ymin
        expected = ((hu[r, c] - (40 - 0.5)) / (400 - 1) + 0.5) * 255
        assert gray[r, c] == round(expected), (r, c, hu[r, c])


def test_mr_truncated_is_rejected():
    with pytest.raises(InvalidImageError, match="truncated"):
        load_image(open(_testfile("MR_truncated.dcm"), "rb").read(), "application/dicom")


def test_monochrome1_is_inverted_relative_to_monochrome2():
    mono2 = _gray(load_image(_dicom("MR_small.dcm", PhotometricInterpretation="MONOCHROME2"), "application/dicom"))
    mono1 = _gray(load_image(_dicom("MR_small.dcm", PhotometricInterpretation="MONOCHROME1"), "application/dicom"))
    assert mono2.min() < mono2.max()
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_header_claiming_huge_image_is_rejected_before_pixel_decoding(monkeypatch):
    def decode_must_not_run(*args, **kwargs):
        raise AssertionError("pixel data was decoded despite the pixel limit")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", decode_must_not_run)
    data = _dicom("MR_small.dcm", Rows=60_000, Columns=60_000, NumberOfFrames=100)
    t0 = time.perf_counter()
    with pytest.raises(InvalidImageError, match="pixel limit"):
        load_image(data, "application/dicom")
    assert time.perf_counter() - t0 < 0.5


def test_dicom_pixel_limit_counts_every_frame():
    data = _dicom("rtdose.dcm")  # 15 frames of 10 x 10
    with pytest.raises(InvalidImageError, match="15 frames"):
        load_image(data, "application/dicom", ImageLimits(max_pixels=1_000))


def test_multiframe_dicom_uses_the_middle_frame():
    frames = pydicom.dcmread(_testfile("rtdose.dcm")).pixel_array.astype(np.float64)  # [15, 10, 10]
    expected = [np.rint((f - f.min()) * 255 / (f.max() - f.min())) for f in frames]
    gray = _gray(load_image(_dicom("rtdose.dcm"), "application/dicom"))
    np.testing.assert_array_equal(gray, expected[7])
    assert not np.array_equal(gray, expected[6]) and not np.array_equal(gray, expected[8])


def test_compressed_dicom_without_a_decoder_names_the_transfer_syntax():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder plugin is installed")
    with pytest.raises(InvalidImageError, match=r"JPEG-LS Lossless.*uncompressed DICOM"):
        load_image(_dicom("MR_small_jpeg_ls_lossless.dcm"), "application/dicom")


def test_rgb_dicom_passes_through_unchanged():
    ds = pydicom.dcmread(_testfile("SC_rgb_small_odd.dcm"))
    image = load_image(_dicom("SC_rgb_small_odd.dcm"), "application/dicom")
    np.testing.assert_array_equal(np.asarray(image), ds.pixel_array)


def test_palette_color_dicom_becomes_rgb():
    image = load_image(_dicom("examples_palette.dcm"), "application/dicom")
    assert image.mode == "RGB" and image.size == (800, 350)


def test_dicom_without_pixel_data_is_rejected():
    with pytest.raises(InvalidImageError, match="no Pixel Data"):
        load_image(_dicom("rtplan.dcm"), "application/dicom")


def test_dicom_image_goes_through_preprocess_to_pixels():
    x = preprocess(_dicom("CT_small.dcm"), "application/dicom", CFG)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()


def test_module_imports_neither_torch_nor_transformers_nor_pydicom_eagerly():
    code = ("import sys, guard.preprocess; "
            "print(sorted(m for m in ('torch', 'transformers', 'pydicom') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
