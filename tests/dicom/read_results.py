#!/usr/bin/env python3
"""Read DICOM result objects with pydicom and print what the tests check, as JSON.

Usage:  read_results.py FILE...

For each file: SOP Class UID, SOP Instance UID, Study and Series Instance UIDs, Patient ID,
Series Description, and every Referenced SOP Instance UID anywhere in the data set (the source
instances a result points to).
"""

import json
import sys

import pydicom


def referenced(ds, out):
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                referenced(item, out)
        elif element.tag == (0x0008, 0x1155):
            out.add(str(element.value))


def main():
    results = []
    for path in sys.argv[1:]:
        ds = pydicom.dcmread(path)
        refs = set()
        referenced(ds, refs)
        results.append(
            {
                "file": path,
                "sop_class": str(ds.SOPClassUID),
                "sop_instance": str(ds.SOPInstanceUID),
                "study": str(ds.StudyInstanceUID),
                "series": str(ds.SeriesInstanceUID),
                "patient_id": str(ds.get("PatientID", "")),
                "series_description": str(ds.get("SeriesDescription", "")),
                "referenced": sorted(refs),
            }
        )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
