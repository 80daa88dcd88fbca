-- Web console (issue 11): the studies list pages newest first by keyset (created_at, study UID),
-- all studies or one state; these indexes make each page an index range scan at any depth.
CREATE INDEX studies_created ON studies (created_at DESC, study_instance_uid DESC);
CREATE INDEX studies_state_created ON studies (state, created_at DESC, study_instance_uid DESC);
