-- 0002: the installation's identity, made once with the database (existing databases get one
-- here). Every job container carries it as a label, so two installations sharing one Docker
-- engine never touch each other's containers, whatever their controller ids.

CREATE TABLE installation (
    id  TEXT PRIMARY KEY                                 -- 32 hex digits, random
);
INSERT INTO installation (id) VALUES (lower(hex(randomblob(16))));
