#!/bin/sh
# The compose demo's writer on blue: a few NovaCron transactions a second (VM status changes,
# which move rows into and out of green's filter; new VMs; hypervisor updates), so the
# dashboard has something to show. Runs until the container stops.
set -eu
until pg_isready -q -h blue -U postgres; do sleep 1; done
while true; do
    psql -q -h blue -U postgres -d novacron -v ON_ERROR_STOP=1 <<'SQL'
BEGIN;
UPDATE virtual_machines
   SET status = (ARRAY['running', 'stopped', 'paused', 'deleted'])[1 + floor(random() * 4)::int], updated_at = now()
 WHERE id IN (SELECT 1 + floor(random() * 10000)::bigint FROM generate_series(1, 20));
INSERT INTO virtual_machines (name, status, owner_id, hypervisor_id, resources)
SELECT 'vm-new', 'creating', 1 + floor(random() * 2000)::bigint, 1 + floor(random() * 200)::bigint,
       '{"cpu_cores": 4, "memory_mb": 4096, "disk_gb": 40}'
  FROM generate_series(1, 5);
UPDATE hypervisors SET capacity = capacity || jsonb_build_object('cpu_cores', 32 + floor(random() * 64)::int)
 WHERE id = 1 + floor(random() * 200)::bigint;
COMMIT;
SQL
    sleep 0.2
done
