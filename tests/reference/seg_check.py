"""Reads a DICOM Segmentation with highdicom (0.28) and pydicom and prints what it says as JSON.

    .venv/bin/python tests/reference/seg_check.py SEG.dcm SOURCE_SOP_INSTANCE_UID...

The independent reader of `tests/seg_object.rs`: the masks are highdicom's reconstruction
(`Segmentation.get_pixels_by_source_instance`, one binary mask per segment and source instance,
in the order of the UIDs given), the volume is `Segmentation.get_volume` (regularly spaced
slices), the rest is read with pydicom. Warnings highdicom logs while reading are printed too.
Exits non-zero when highdicom cannot read the object.
"""

import json
import logging
import sys

import highdicom as hd
import numpy as np
import pydicom


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def code(item):
    return [str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)]


def main():
    path, uids = sys.argv[1], sys.argv[2:]
    collect = Collect()
    logging.getLogger("highdicom").addHandler(collect)

    ds = pydicom.dcmread(path)
    seg = hd.seg.segread(path)

    segments = []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        item = ds.SegmentSequence[number - 1]
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        segments.append({
            "number": int(number),
            "label": description.segment_label,
            "category": code(item.SegmentedPropertyCategoryCodeSequence[0]),
            "type": code(item.SegmentedPropertyTypeCodeSequence[0]),
            "algorithm_type": description.algorithm_type.value,
            "algorithm_name": str(item.SegmentAlgorithmName),
            "algorithm_family": code(algorithm.AlgorithmFamilyCodeSequence[0]),
            "algorithm_version": str(algorithm.AlgorithmVersion),
            "algorithm_parameters": str(algorithm.AlgorithmParameters),
            "cielab": [int(v) for v in item.RecommendedDisplayCIELabValue],
            # The sRGB colour highdicom converts the CIELab value back to.
            "rgb": list(
                hd.color.CIELabColor.from_dicom_value(
                    [int(v) for v in item.RecommendedDisplayCIELabValue]
                ).to_rgb(clip=True)
            ),
        })

    # (source instances, rows, columns, segments), binary.
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=seg.segment_numbers,
    )
    masks = {
        uid: {
            str(number): pixels[i, :, :, s].astype(int).tolist()
            for s, number in enumerate(seg.segment_numbers)
        }
        for i, uid in enumerate(uids)
    }

    try:
        volume = seg.get_volume()
        volume = {
            "shape": list(volume.array.shape),
            "spacing": [float(v) for v in volume.spacing],
            "position": [float(v) for v in volume.position],
            "sum": int(np.asarray(volume.array, dtype=np.int64).sum()),
        }
    except Exception as e:  # noqa: BLE001 - reported to the Rust test
        volume = {"error": f"{type(e).__name__}: {e}"}

    frame_sources = []
    for groups in ds.PerFrameFunctionalGroupsSequence:
        source = groups.DerivationImageSequence[0].SourceImageSequence[0]
        frame_sources.append([
            int(groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            str(source.ReferencedSOPInstanceUID),
        ])

    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    print(json.dumps({
        "pixel_measures": {
            "PixelSpacing": [float(v) for v in measures.PixelSpacing],
            "SliceThickness": float(measures.SliceThickness),
            "SpacingBetweenSlices": (
                float(measures.SpacingBetweenSlices)
                if "SpacingBetweenSlices" in measures else None
            ),
        },
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "sop_class": str(ds.SOPClassUID),
        "modality": str(ds.Modality),
        "segmentation_type": seg.segmentation_type.value,
        "number_of_frames": int(ds.NumberOfFrames),
        "series_description": str(ds.SeriesDescription),
        "content_description": str(ds.ContentDescription),
        "content_label": str(ds.ContentLabel),
        "image_comments": str(ds.get("ImageComments", "")),
        "image_type": [str(v) for v in ds.ImageType],
        "attributes": {k: str(ds.get(k, "<absent>")) for k in [
            "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "FrameOfReferenceUID", "Manufacturer", "ManufacturerModelName",
            "SoftwareVersions", "DeviceSerialNumber", "SpecificCharacterSet", "SeriesNumber"]},
        "segments": segments,
        "source_images": [[str(a), str(b), str(c)] for a, b, c in seg.get_source_image_uids()],
        "frame_sources": frame_sources,
        "masks": masks,
        "volume": volume,
        "highdicom_warnings": collect.messages,
    }))


if __name__ == "__main__":
    main()
