DROP TABLE visit_fields;
DROP TABLE consent_records;
DROP TABLE visits;
DROP TABLE consent_texts;
DROP TABLE widgets;
