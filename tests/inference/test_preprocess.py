"""Preprocessing: DICOM pixel pipeline, letterbox geometry and the non-antialiased bilinear resize."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.preprocess import (
    Letterbox,
    PreprocessError,
    images_to_tensor,
    pad_letterbox,
    prepare_array,
    prepare_dataset,
    resize_bilinear_uint8,
)

# --- independent reference implementations (plain numpy) -------------------------------------


def numpy_bilinear(image: np.ndarray, out_rows: int, out_cols: int) -> np.ndarray:
    """Bilinear, half-pixel centres (align_corners=False), no antialias, edge clamped; float64."""
    rows, cols = image.shape
    src = image.astype(np.float64)

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coord = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        coord = np.maximum(coord, 0.0)
        low = np.minimum(np.floor(coord).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, coord - low

    y0, y1, fy = axis(out_rows, rows)
    x0, x1, fx = axis(out_cols, cols)
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def reference_prepare(display: np.ndarray) -> np.ndarray:
    """The reference's rules written out: min-max, x*255 truncated, symmetric pad, bilinear resize."""
    unit = (display - display.min()) / (display.max() - display.min())
    image8 = (unit * 255).astype(np.uint8)
    rows, cols = image8.shape
    pad = abs(rows - cols) // 2
    padded = np.pad(image8, ((pad, pad), (0, 0)) if cols > rows else ((0, 0), (pad, pad)))
    import cv2  # the reference's resize (its fixed-point result is what the model saw in training)

    return cv2.resize(padded, (1024, 1024), interpolation=cv2.INTER_LINEAR)


def dicom_linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR, output range [0, 1]."""
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    y[x <= center - 0.5 - (width - 1) / 2] = 0.0
    y[x > center - 0.5 + (width - 1) / 2] = 1.0
    return y


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, signed: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.tobytes()
    return ds


def assert_close_uint8(actual: np.ndarray, expected: np.ndarray, max_diff: int = 1, exact_fraction: float = 0.999) -> None:
    diff = np.abs(actual.astype(int) - expected.astype(int))
    assert diff.max() <= max_diff, f"max difference {diff.max()} gray levels"
    assert (diff == 0).mean() >= exact_fraction, f"only {(diff == 0).mean():.4%} pixels identical"


# --- letterbox geometry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "cols", "pad_x", "pad_y", "padded"),
    [
        (300, 200, 50, 0, (300, 300)),  # portrait, even difference
        (301, 200, 50, 0, (301, 300)),  # portrait, odd difference: one pixel short of square
        (200, 333, 0, 66, (332, 333)),  # landscape, odd difference
        (256, 256, 0, 0, (256, 256)),  # square
    ],
)
def test_letterbox_geometry_follows_reference_padding(rows, cols, pad_x, pad_y, padded):
    box = Letterbox.for_shape(rows, cols)
    assert (box.pad_x, box.pad_y) == (pad_x, pad_y)
    assert (box.padded_rows, box.padded_columns) == padded
    assert box.scale_x == pytest.approx(1024 / padded[1])
    assert box.scale_y == pytest.approx(1024 / padded[0])
    prepared = prepare_array(np.random.default_rng(0).integers(0, 4096, (rows, cols)))
    assert prepared.pixels.shape == (1024, 1024) and prepared.pixels.dtype == np.uint8
    assert prepared.letterbox == box


def test_odd_difference_keeps_separate_scales():
    box = Letterbox.for_shape(301, 200)
    assert box.scale_x != box.scale_y
    # The last source row maps to the bottom edge of the model frame, the last column plus the pad
    # to the right edge: separate scales make both exact.
    assert box.to_model((0, 0, 200, 301))[2:] == pytest.approx((1024 * 250 / 300, 1024.0))


@pytest.mark.parametrize("shape", [(2500, 2048), (1800, 2600), (1500, 1500), (801, 600), (600, 999)])
def test_letterbox_round_trip_is_exact(shape):
    box = Letterbox.for_shape(*shape)
    rng = np.random.default_rng(1)
    for _ in range(50):
        model_box = tuple(rng.uniform(-50, 1100, 4))
        assert box.to_model(box.to_source(model_box)) == pytest.approx(model_box, abs=1e-6)
        source_box = tuple(rng.uniform(-10, max(shape) + 10, 4))
        assert box.to_source(box.to_model(source_box)) == pytest.approx(source_box, abs=1e-6)


def test_clip_to_image():
    box = Letterbox.for_shape(300, 200)
    assert box.clip((-5.0, -1.0, 250.0, 400.0)) == (0.0, 0.0, 200.0, 300.0)
    assert box.clip((10.0, 20.0, 30.0, 40.0)) == (10.0, 20.0, 30.0, 40.0)


def edge_position(profile: np.ndarray, rising: bool) -> float:
    """Sub-pixel position (pixel-edge coordinates) where a 0/255 step crosses half height."""
    values = profile.astype(np.float64)
    level = 127.5
    idx = np.nonzero(values >= level)[0] if rising else np.nonzero(values < level)[0]
    i = idx[0] if rising else idx[0]
    a, b = values[i - 1], values[i]
    frac = (level - a) / (b - a)
    # pixel j samples the continuous coordinate j + 0.5
    return (i - 1 + 0.5) + frac


@pytest.mark.parametrize("shape", [(2000, 1600), (1400, 1900), (1700, 1700), (700, 501)])
def test_box_in_model_frame_maps_back_within_one_source_pixel(shape):
    rows, cols = shape
    source_box = (int(cols * 0.21), int(rows * 0.33), int(cols * 0.67), int(rows * 0.71))
    image = np.zeros(shape, dtype=np.uint16)
    x1, y1, x2, y2 = source_box
    image[y1:y2, x1:x2] = 1000
    prepared = prepare_array(image)
    pixels = prepared.pixels
    middle_row = pixels[int((prepared.letterbox.to_model(source_box)[1] + prepared.letterbox.to_model(source_box)[3]) / 2)]
    middle_col = pixels[:, int((prepared.letterbox.to_model(source_box)[0] + prepared.letterbox.to_model(source_box)[2]) / 2)]
    found_model = (
        edge_position(middle_row, rising=True),
        edge_position(middle_col, rising=True),
        edge_position(middle_row[::-1], rising=True),
        edge_position(middle_col[::-1], rising=True),
    )
    found_model = (found_model[0], found_model[1], 1024 - found_model[2], 1024 - found_model[3])
    back = prepared.letterbox.clip(prepared.letterbox.to_source(found_model))
    assert back == pytest.approx(source_box, abs=1.0), (back, source_box)


# --- resize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2500, 2500), (1333, 1337), (700, 701), (1024, 1024), (3001, 2999)])
def test_resize_matches_numpy_bilinear_without_antialias(shape):
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    # smooth content plus a hard edge, so interpolation weights matter
    image[:, : shape[1] // 3] = 255
    ours = resize_bilinear_uint8(image, 1024)
    expected = np.clip(np.rint(numpy_bilinear(image, 1024, 1024)), 0, 255).astype(np.uint8)
    # same sampling geometry as a float bilinear; OpenCV's 11-bit fixed point (and its area filter at
    # exactly 2:1) moves some pixels by one gray level, so only the bound is exact here
    assert_close_uint8(ours, expected, exact_fraction=0.8)


def test_resize_is_not_antialiased():
    # Diagonal stripes with period 3, downsampled 3:1: each output pixel samples exactly source pixel
    # (3i+1, 3j+1), which is never on a stripe, so a non-antialiased resize gives pure black while an
    # antialiased one averages to ~85 (one third of 255).
    board = (np.indices((3072, 3072)).sum(axis=0) % 3 == 0).astype(np.uint8) * 255
    ours = resize_bilinear_uint8(board, 1024)
    expected = np.clip(np.rint(numpy_bilinear(board, 1024, 1024)), 0, 255).astype(np.uint8)
    assert_close_uint8(ours, expected)
    import torch
    import torch.nn.functional as F

    smooth = F.interpolate(torch.from_numpy(board).float()[None, None], size=(1024, 1024), mode="bilinear", align_corners=False, antialias=True)
    assert ours.mean() < 1 and float(smooth.mean()) > 80


@pytest.mark.parametrize(
    "shape",
    [
        (2500, 2048),  # portrait, even padding
        (1536, 2048),  # landscape, padded to 2048 square: OpenCV's exact 2:1 path
        (1024, 1024),  # square, identity size
        (2048, 2048),  # square, 2:1
        (3000, 2999),  # odd difference: one pixel short of square
        (700, 1201),  # odd difference, upscaled
        (333, 333),  # square, upscaled
    ],
)
def test_prepared_pixels_equal_opencv_inter_linear_bit_for_bit(shape):
    """The reference letterboxes with numpy and resizes with cv2.INTER_LINEAR: our uint8 image must be
    identical, not within a gray level (a float bilinear differs in ~11% of pixels)."""
    import cv2

    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    # smooth gradient + noise + a hard edge: every fixed-point weight and rounding step shows
    y, x = np.mgrid[0:rows, 0:cols]
    display = (x / cols * 180 + y / rows * 60 + rng.normal(0, 12, shape)).clip(0, 255)
    display[:, : cols // 5] = 0
    prepared = prepare_array(display)
    image8 = ((display - display.min()) / (display.max() - display.min()) * 255).astype(np.uint8)
    pad = abs(rows - cols) // 2
    padded = np.pad(image8, ((pad, pad), (0, 0)) if cols > rows else ((0, 0), (pad, pad)))
    expected = cv2.resize(padded, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (1024, 1024)
    differing = int((prepared.pixels != expected).sum())
    assert differing == 0, f"{shape}: {differing} pixels differ from cv2.INTER_LINEAR"


def test_rg1_equals_opencv_inter_linear_bit_for_bit():
    import cv2

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    prepared = prepare_dataset(ds)
    stored = ds.pixel_array.astype(np.float64)
    windowed = dicom_linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth))
    display = windowed.max() - windowed
    image8 = ((display - display.min()) / (display.max() - display.min()) * 255).astype(np.uint8)
    padded = pad_letterbox(image8, Letterbox.for_shape(*image8.shape))
    expected = cv2.resize(padded, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(prepared.pixels, expected)


def test_resize_rejects_non_uint8():
    with pytest.raises(PreprocessError, match="uint8"):
        resize_bilinear_uint8(np.zeros((10, 10), dtype=np.float32), 1024)


# --- DICOM pixel pipeline ----------------------------------------------------------------------


def test_rg1_monochrome1_is_inverted_after_window():
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    prepared = prepare_dataset(ds)
    stored = ds.pixel_array.astype(np.float64)
    windowed = dicom_linear_window(stored, float(ds.WindowCenter), float(ds.WindowWidth))
    expected = reference_prepare(windowed.max() - windowed)
    assert_close_uint8(prepared.pixels, expected)
    assert prepared.sop_instance_uid == ds.SOPInstanceUID
    assert (prepared.letterbox.source_rows, prepared.letterbox.source_columns) == (ds.Rows, ds.Columns)
    # Reading the same pixels as MONOCHROME2 gives the negative image.
    ds.PhotometricInterpretation = "MONOCHROME2"
    positive = prepare_dataset(ds).pixels.astype(int)
    inside = np.s_[100:900, 100:900]
    assert np.corrcoef(positive[inside].ravel(), prepared.pixels[inside].astype(int).ravel())[0, 1] < -0.99


def test_voi_window_linear_clips_outside_window():
    pixels = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (300, 1))  # 300 x 400 ramp
    ds = make_dataset(pixels)
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    expected = reference_prepare(dicom_linear_window(pixels.astype(np.float64), 2000, 1000))
    prepared = prepare_dataset(ds)
    assert_close_uint8(prepared.pixels, expected)
    row = prepared.pixels[512, 300:700]
    assert row.min() == 0 and row.max() == 255  # saturated both ends by the window


def test_voi_sigmoid():
    pixels = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (400, 1))
    ds = make_dataset(pixels)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000, 800, "SIGMOID"
    x = pixels.astype(np.float64)
    expected = reference_prepare(1.0 / (1.0 + np.exp(-4.0 * (x - 2000) / 800)))
    assert_close_uint8(prepare_dataset(ds).pixels, expected)


def test_voi_lut_sequence_is_applied():
    pixels = np.tile(np.arange(0, 1024, 4, dtype=np.uint16), (256, 1))  # values 0..1020
    ds = make_dataset(pixels)
    lut = ((np.arange(512) / 511.0) ** 2 * 4095).astype(np.uint16)  # first mapped value 256, 512 entries
    item = Dataset()
    item.LUTDescriptor = [512, 256, 12]
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 10, 2  # present too: the LUT sequence wins, as in the reference
    x = pixels.astype(np.int64)
    expected_display = lut[np.clip(x - 256, 0, 511)].astype(np.float64)
    assert_close_uint8(prepare_dataset(ds).pixels, reference_prepare(expected_display))


def test_modality_lut_applies_when_no_voi():
    pixels = np.tile(np.arange(0, 3000, 10, dtype=np.uint16), (300, 1))
    ds = make_dataset(pixels)
    ds.RescaleSlope, ds.RescaleIntercept = -2, 100
    expected = reference_prepare(pixels.astype(np.float64) * -2 + 100)
    prepared = prepare_dataset(ds)
    assert_close_uint8(prepared.pixels, expected)
    assert prepared.pixels[512, 50] > prepared.pixels[512, 900]  # negative slope: brighter on the left


@pytest.mark.parametrize(
    ("modality", "slope", "intercept", "center", "width"),
    [
        ("CT", 1.0, -1024.0, 40.0, 400.0),  # stored = HU + 1024, a soft-tissue window in HU
        ("MR", 2.5, -100.0, 1500.0, 2000.0),  # a scaled modality with its window in rescaled units
    ],
)
def test_window_applies_to_the_rescaled_values_not_the_stored_ones(modality, slope, intercept, center, width):
    """The chosen order: Modality LUT, then the window (PS3.3 C.11.2.1.2). The reference's reader
    windows the stored values, which puts the window somewhere else: most pixels differ."""
    stored = np.tile(np.arange(0, 1400, 4, dtype=np.uint16), (300, 1))  # 300 x 350 ramp
    ds = make_dataset(stored)
    ds.Modality = modality
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center, width
    rescaled = stored.astype(np.float64) * slope + intercept
    prepared = prepare_dataset(ds)
    assert_close_uint8(prepared.pixels, reference_prepare(dicom_linear_window(rescaled, center, width)))
    stored_windowed = reference_prepare(dicom_linear_window(stored.astype(np.float64), center, width))
    pad = int(prepared.letterbox.pad_y * prepared.letterbox.scale_y) + 2
    image = slice(pad, 1024 - pad)  # the rows of the image, not of the letterbox padding
    differ = np.abs(prepared.pixels[image].astype(int) - stored_windowed[image].astype(int))
    assert (differ > 0).mean() > 0.5 and differ.max() >= 100  # most pixels, by many gray levels


def test_an_identity_rescale_with_a_window_matches_the_stored_value_window_exactly():
    """Chest CR/DX as sent (slope 1, intercept 0, a window): both orders give the same image."""
    stored = np.tile(np.arange(0, 4000, 10, dtype=np.uint16), (300, 1))
    ds = make_dataset(stored)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    without = make_dataset(stored)
    without.WindowCenter, without.WindowWidth = 2000, 1000
    np.testing.assert_array_equal(prepare_dataset(ds).pixels, prepare_dataset(without).pixels)
    assert_close_uint8(prepare_dataset(ds).pixels, reference_prepare(dicom_linear_window(stored.astype(np.float64), 2000, 1000)))


def test_bits_stored_12_in_16_bit_container_ignores_high_bits():
    rng = np.random.default_rng(4)
    clean = rng.integers(0, 4096, (500, 400), dtype=np.uint16)
    dirty = clean | (rng.integers(0, 16, clean.shape, dtype=np.uint16) << 12)  # garbage in bits 12-15
    prepared_dirty = prepare_dataset(make_dataset(dirty, bits_stored=12))
    prepared_clean = prepare_array(clean)
    np.testing.assert_array_equal(prepared_dirty.pixels, prepared_clean.pixels)


def test_signed_pixels():
    values = np.tile(np.arange(-1000, 1000, 5, dtype=np.int16), (300, 1))
    prepared = prepare_dataset(make_dataset(values, signed=True))
    assert_close_uint8(prepared.pixels, reference_prepare(values.astype(np.float64)))


def test_min_max_truncates_not_rounds():
    # 0, 1, 2 stretched: 1/2 * 255 = 127.5 -> 127 (truncated as the reference's astype)
    image = np.array([[0, 1, 2, 2]] * 4, dtype=np.uint16)
    prepared = prepare_array(image)
    assert set(np.unique(prepared.pixels[400:600, :])) <= set(range(256))
    from inference.preprocess import stretch_to_uint8

    assert stretch_to_uint8(image)[0].tolist() == [0, 127, 255, 255]


# --- unusable input ----------------------------------------------------------------------------


def test_no_pixel_data_is_refused():
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint16))
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no Pixel Data"):
        prepare_dataset(ds)


def test_multiframe_is_refused():
    ds = make_dataset(np.arange(32, dtype=np.uint16).reshape(2, 4, 4))
    ds.NumberOfFrames = 2
    with pytest.raises(PreprocessError, match="multi-frame"):
        prepare_dataset(ds)


def test_colour_is_refused():
    ds = make_dataset(np.zeros((4, 4), dtype=np.uint8))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
    with pytest.raises(PreprocessError, match="colour"):
        prepare_dataset(ds)


def test_constant_image_is_refused():
    with pytest.raises(PreprocessError, match="constant image"):
        prepare_array(np.full((50, 60), 7, dtype=np.uint16))
    with pytest.raises(PreprocessError, match="2-D"):
        prepare_array(np.zeros((3, 50, 60)))
    with pytest.raises(PreprocessError, match="NaN"):
        prepare_array(np.array([[0.0, math.nan], [1.0, 2.0]]))


def test_images_to_tensor():
    rng = np.random.default_rng(5)
    images = [prepare_array(rng.integers(0, 100, (300, 200))), prepare_array(rng.integers(0, 100, (200, 300)))]
    batch = images_to_tensor(images)
    assert tuple(batch.shape) == (2, 1, 1024, 1024)
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    np.testing.assert_allclose(batch[1, 0].numpy() * 255, images[1].pixels, atol=1e-4)
    with pytest.raises(PreprocessError):
        images_to_tensor([])
