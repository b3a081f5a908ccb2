"""Reads a TID 1500 measurement report with highdicom (0.28) and pydicom; prints what it says as JSON.

    .venv/bin/python tests/reference/measurement_check.py REPORT.dcm [SEG.dcm]

The independent reader of `tests/measurement_report.rs`: `highdicom.sr.srread` parses the document
as a `MeasurementReport` (Content Template TID 1500), whose
`get_volumetric_roi_measurement_groups()` gives the TID 1411 groups; each group's tracking
identifier and UID, finding category and type, referenced segment (the SEG's SOP Class and
Instance UIDs, the segment number, the source series) and its measurements (value, unit, method)
are printed, with the groups highdicom finds by that tracking UID and by that finding (look-ups
that check the relationship types), as are the observer context, the evidence and the texts of the root. With SEG.dcm,
each group is also looked up with `get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=
<the SEG's SOP Instance UID>, reference_type=codes.DCM.ReferencedSegment)`, and
`ReferencedSegment.from_segmentation` on the SEG gives the reference highdicom itself would write.
Warnings highdicom logs while reading are printed too. Exits non-zero when highdicom cannot read it.
"""

import json
import logging
import sys

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def code(concept):
    if concept is None:
        return None
    return [str(concept.value), str(concept.scheme_designator), str(concept.meaning)]


def main():
    path = sys.argv[1]
    seg_path = sys.argv[2] if len(sys.argv) > 2 else None
    collect = Collect()
    logging.getLogger("highdicom").addHandler(collect)

    ds = pydicom.dcmread(path)
    sr = hd.sr.srread(path)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise SystemExit(f"not read as a MeasurementReport but {type(report).__name__}")
    root = report[0]

    groups = []
    for group in report.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        segment_item = segment[0]
        reference = segment_item.ReferencedSOPSequence[0]
        source_series = [
            str(item.value) for item in segment
            if item.name == codes.DCM.SourceSeriesForSegmentation
        ]
        measurements = []
        for m in group.get_measurements():
            measurements.append({
                "name": code(m.name),
                "value": float(m.value),
                "unit": code(m.unit),
                "method": code(m.method),
            })
        algorithm = {
            str(item.name.meaning): str(item.value)
            for item in group[0].ContentSequence
            if item.relationship_type == hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
            and item.value_type == hd.sr.ValueTypeValues.TEXT
        }
        groups.append({
            "template": group[0].template_id,
            "reference_type": code(group.reference_type),
            "tracking_identifier": group.tracking_identifier,
            "tracking_uid": str(group.tracking_uid),
            "finding": code(group.finding_type),
            "finding_category": code(group.finding_category),
            "referenced_sop_class": str(reference.ReferencedSOPClassUID),
            "referenced_sop_instance": str(reference.ReferencedSOPInstanceUID),
            "referenced_segment_numbers": [
                int(v) for v in (
                    reference.ReferencedSegmentNumber
                    if isinstance(reference.ReferencedSegmentNumber, pydicom.multival.MultiValue)
                    else [reference.ReferencedSegmentNumber]
                )
            ],
            "source_series": source_series,
            # highdicom's own look-ups, which check the relationship types: the tracking UID
            # (HAS OBS CONTEXT) and the finding (CONTAINS).
            "found_by_tracking_uid": [
                g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups(
                    tracking_uid=group.tracking_uid
                )
            ],
            "found_by_finding": [
                g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups(
                    finding_type=group.finding_type
                )
            ],
            "measurements": measurements,
            "algorithm": algorithm,
        })

    observers = []
    for context in report.get_observer_contexts():
        attributes = context.observer_identifying_attributes
        observers.append({
            "type": code(context.observer_type),
            "uid": str(attributes.uid),
            "name": attributes.name,
            "manufacturer": attributes.manufacturer_name,
            "model": attributes.model_name,
        })

    by_seg = None
    reference_from_seg = None
    if seg_path is not None:
        seg = pydicom.dcmread(seg_path)
        found = report.get_volumetric_roi_measurement_groups(
            referenced_sop_instance_uid=seg.SOPInstanceUID,
            reference_type=codes.DCM.ReferencedSegment,
        )
        by_seg = [g.tracking_identifier for g in found]
        # What highdicom would write for segment 1 of this SEG: its source series.
        written = hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=1)
        reference_from_seg = {
            "sop_instance": str(written[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
            "items": [[code(item.name), item.value_type.value] for item in written],
        }

    root_items = [
        {
            "relationship": item.relationship_type.value,
            "value_type": item.value_type.value,
            "name": code(item.name),
        }
        for item in root.ContentSequence
    ]
    texts = [
        [str(item.name.meaning), str(item.value)]
        for item in root.ContentSequence
        if item.value_type == hd.sr.ValueTypeValues.TEXT
        and item.relationship_type == hd.sr.RelationshipTypeValues.CONTAINS
    ]
    procedure = [
        code(item.value) for item in root.ContentSequence
        if item.name == codes.DCM.ProcedureReported
    ]
    language = [
        code(item.value) for item in root.ContentSequence
        if item.name == codes.DCM.LanguageOfContentItemAndDescendants
    ]
    library = [
        [str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for image in group.ContentSequence]
        for library in root.ContentSequence if library.name == codes.DCM.ImageLibrary
        for group in library.ContentSequence
    ]

    print(json.dumps({
        "sop_class": str(ds.SOPClassUID),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "title": code(root.name),
        "template": root.template_id,
        "attributes": {k: str(ds.get(k, "<absent>")) for k in [
            "PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
            "SOPInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
            "SpecificCharacterSet", "CompletionFlag", "VerificationFlag"]},
        "evidence": [[str(u) for u in e] for e in sr.get_evidence()],
        "observers": observers,
        "procedure_reported": procedure,
        "language": language,
        "image_library": library,
        "root_items": root_items,
        "texts": texts,
        "groups": groups,
        "groups_of_seg": by_seg,
        "reference_from_seg": reference_from_seg,
        "highdicom_warnings": collect.messages,
    }))


if __name__ == "__main__":
    main()
