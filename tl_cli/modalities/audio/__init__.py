"""Audio: the speech_embedding backbone (torch mel front end + converted encoder), audio folder data, the audio modality."""
